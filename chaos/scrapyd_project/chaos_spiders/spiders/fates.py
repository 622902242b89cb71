"""The chaos trials' spider: Scrapyd hands it the retry's id as `_job`; its fate is seeded by the
trial and the job (complete, fail with a 503 or a 404, complete slowly, hang, or die without
writing). It writes its row's outcome conditionally on `running`, as a fleet's spider does, and
logs to $CHAOS_SPIDER_LOG `start <job> <pid> <fate>`, then `completed <job>` / `failed <job>`
once its write committed (the auditor: no job ran twice, no completion was overwritten)."""

import os
import random
import time
import zlib

import psycopg2
import scrapy

FATES = {"complete": 45, "fail": 15, "not_found": 4, "slow": 10, "hang": 8, "die": 18}
ERRORS = {"fail": "HTTP Error 503: Service Unavailable", "not_found": "HTTP Error 404: Not Found"}
WRITE_FOR = 8.0  # seconds a write is tried for while the database restarts


class FatesSpider(scrapy.Spider):
    name = "fates"

    def __init__(self, _job=None, **kwargs):
        super().__init__(**kwargs)
        self.job = _job

    def log_line(self, line):
        with open(os.environ["CHAOS_SPIDER_LOG"], "a", buffering=1) as out:
            out.write(line + "\n")

    async def start(self):
        rng = random.Random(zlib.crc32(f"{os.environ.get('CHAOS_SEED', '0')}:{self.job}".encode()))
        fate = rng.choices(list(FATES), list(FATES.values()))[0]
        self.log_line(f"start {self.job} {os.getpid()} {fate}")
        if fate == "die":
            os._exit(3)
        if fate == "hang":
            time.sleep(float(os.environ.get("CHAOS_HANG", "12")))
            return
        if fate == "slow":
            time.sleep(rng.uniform(0.5, 1.5))
        status = "completed" if fate in ("complete", "slow") else "failed"
        deadline = time.monotonic() + WRITE_FOR
        while True:
            try:
                with psycopg2.connect(os.environ["CHAOS_SPIDER_DB"], connect_timeout=2) as conn, conn.cursor() as cur:
                    cur.execute(
                        "UPDATE scrape_runs SET status = %s, completed_at = now(), error_message = %s "
                        "WHERE id::text = %s AND status = 'running' RETURNING id",
                        (status, ERRORS.get(fate), self.job),
                    )
                    wrote = cur.fetchone() is not None
                conn.close()
                break
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    return  # the write was lost with the database: the row is the stuck checker's
                time.sleep(0.3)
        if wrote:  # logged once committed
            self.log_line(f"{status} {self.job}")
        return
        yield  # an async generator that starts no request
