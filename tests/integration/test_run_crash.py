"""The crash test of issue 7: 2,000 messages from 20 concurrent SMTP clients while
``pyqmail run`` is killed with SIGKILL three times at random moments and restarted.

Every message acknowledged with 250 must be delivered; the test prints how many arrived
twice (at-least-once: a duplicate is possible only when a delivery finished and the crash
came before its result was recorded, as in qmail).
"""

from __future__ import annotations

import random
import smtplib
import threading
import time
from collections import Counter
from pathlib import Path

from pyqmail.home import Home
from tests.integration.test_run_daemon import Mta, _ids, files, wait_for

CLIENTS = 20
PER_CLIENT = 100  # 2,000 messages


def test_three_sigkills_during_2000_messages_lose_nothing_acknowledged(
    home: Home, tmp_path: Path
) -> None:
    mta = Mta(home, tmp_path)
    mta.start()
    acked: list[bytes] = []
    lock = threading.Lock()

    give_up = time.monotonic() + 400

    def client(k: int) -> None:
        i = 0
        while i < PER_CLIENT:
            try:
                s = smtplib.SMTP("127.0.0.1", mta.port, timeout=20)
            except (OSError, smtplib.SMTPException):
                if time.monotonic() > give_up:
                    return
                time.sleep(0.05)  # down between a kill and the restart: nothing in flight
                continue
            try:
                with s:
                    while i < PER_CLIENT:
                        mid = f"c{k:02d}-{i:03d}"
                        s.sendmail(
                            "joe@test.example",
                            ["alice@test.example"],
                            f"Subject: {mid}\r\nX-Id: {mid}\r\n\r\nbody {mid}\r\n",
                        )
                        with lock:
                            acked.append(mid.encode())
                        i += 1
            except (OSError, smtplib.SMTPException):
                i += 1  # the message in flight was not acknowledged: skip it
                time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    rng = random.Random()
    try:
        for _ in range(3):
            target = len(acked) + rng.randrange(100, 400)
            wait_for(lambda t=target: len(acked) >= t or not any(x.is_alive() for x in threads),
                     timeout=120, what="progress before a kill")  # fmt: skip
            mta.kill9()
            mta.start()
        for t in threads:
            t.join(300)
        assert len(acked) >= 1500, f"only {len(acked)} acknowledged"
        want = set(acked)
        wait_for(lambda: want <= set(_ids(mta.maildir("alice"))), timeout=180,
                 what="every acknowledged message delivered")  # fmt: skip
        counts = Counter(_ids(mta.maildir("alice")))
        twice = sum(1 for m in want if counts[m] > 1)
        print(f"\n{len(acked)} acknowledged, all delivered, {twice} delivered twice, "
              f"{len(files(mta.maildir('alice')))} files")  # fmt: skip
        assert mta.stop() == 0
    finally:
        if mta.proc is not None and mta.proc.poll() is None:
            mta.kill9()
