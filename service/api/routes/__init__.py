"""The API's routers: predictions and operations."""
