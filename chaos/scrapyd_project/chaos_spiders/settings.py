"""The Scrapy project the chaos trials deploy to their Scrapyd (chaos/scrapyd.py)."""

BOT_NAME = "chaos_spiders"
SPIDER_MODULES = ["chaos_spiders.spiders"]
LOG_LEVEL = "WARNING"
TELNETCONSOLE_ENABLED = False
ROBOTSTXT_OBEY = False
