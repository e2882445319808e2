"""``pyqmail adopt``: take over a live qmail installation, and hand it back.

- shellwords.py  a careful reader of run-script shell (words, quotes, redirections; no execution)
- services.py    what a run script starts: tcpserver's flags, rblsmtpd, qmail-smtpd, qmail-start
- site.py        control files, users, .qmail files, the queue: what pyqmail reads as it is
- plan.py        the report, the `pyqmail run` command, the files swapped (with backups), rollback
"""
