"""Local delivery: users/assign, qmail-getpw, qmail-local, and the delivery spawner."""
