"""A spider as a fleet writes one: it gets the run's id as Scrapyd's `_job` (the retry's id) and
writes its row's outcome conditionally on `running`. `mode` (a spider argument) says what this one
does: `write` its outcome at once, `hang` (deaf to SIGINT), `die` (the process killed mid-run) or `leave` the row
as it is (it ends without writing its status)."""

import os
import signal
import time

import psycopg2
import scrapy


class RowsSpider(scrapy.Spider):
    name = "rows"

    def __init__(self, mode="write", db="", table="scrape_runs", _job=None, **kwargs):
        super().__init__(**kwargs)
        self.mode, self.db, self.table, self.job = mode, db, table, _job

    async def start(self):
        if self.mode == "write":
            with psycopg2.connect(self.db) as conn, conn.cursor() as cur:
                cur.execute(
                    f"UPDATE {self.table} SET status = 'completed', completed_at = now() "
                    "WHERE id::text = %s AND status = 'running'",
                    (self.job,),
                )
        elif self.mode == "hang":  # and deaf to cancel.json's SIGINT, as a spider stuck in C code is
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            open(f"{self.job}.hanging", "w").close()  # in Scrapyd's directory: the test knows it hangs now
            time.sleep(600)
        elif self.mode == "die":
            os._exit(3)
        return
        yield  # an async generator that starts no request
