"""Running a test body from several Python threads at once (the serving tests)."""

import sys
import threading


def run_threads(fn, n: int = 2, switch_interval: float = 1e-6) -> list:
    """``fn(i)`` for ``i < n`` in ``n`` threads at once, with the interpreter switching threads as often as it can
    (``sys.setswitchinterval``, restored afterwards) so that they interleave; returns the exceptions raised."""
    errors, old = [], sys.getswitchinterval()

    def work(i):
        try:
            fn(i)
        except Exception as e:  # noqa: BLE001 - reported to the test
            errors.append(e)

    sys.setswitchinterval(switch_interval)
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    return errors
