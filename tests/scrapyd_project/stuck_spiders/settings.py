"""The tiny Scrapy project the tests deploy to a real Scrapyd (tests/scrapyd_fleet.py)."""

BOT_NAME = "stuck_spiders"
SPIDER_MODULES = ["stuck_spiders.spiders"]
LOG_LEVEL = "WARNING"
TELNETCONSOLE_ENABLED = False
ROBOTSTXT_OBEY = False
