"""``pyqmail run``: the supervisor that starts listeners, scheduler and agents."""
