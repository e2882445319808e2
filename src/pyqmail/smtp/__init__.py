"""SMTP: the server conversation (qmail-smtpd) and the client conversation (qmail-remote)."""
