"""The JSON API's routes by concern; `scheduler.web.api` assembles them."""
