"""qmail's on-disk queue: layout, envelopes, the crash-safe writer, readers and cleaning.

- layout.py    QueuePaths: where each file of message N lives (split dirs by N % 23)
- codes.py     qmail-queue's exit codes and the caller's D/Z text (qq_result)
- envelope.py  fd-1 envelope parser (11/54/91) and the todo/intd record format
- writer.py    QueueWriter/Pending: the crash-safe insertion (fsyncs, group commit)
- submit.py    submitter(home): QMAILQUEUE program, QMQP (mini-qmail: control/qmqpservers),
               the in-process writer, or the queue service
- service.py   the queue service (Unix socket, SO_PEERCRED) for multi-user mode
- recover.py   the named crash states and clean_stale (start-up/periodic clean)
- records.py   info/local/remote files for send/ (F/T records, D marking)
- clean.py     qmail-clean's job: removal order after preprocessing and when done
- reader.py    qmail-qstat counts and qmail-qread listing
"""
