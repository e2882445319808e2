"""Mail from programs and other hosts: qmail-inject, sendmail, QMQP and QMTP."""
