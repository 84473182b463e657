def includeme(config):
    config.add_route("home", "/")
    config.add_route("orders", "/orders")
    # ASCII digits only (``\d`` and int() accept other scripts' digits too),
    # at most 18 so every id fits a 64-bit integer: anything else is a 404.
    config.add_route("order", "/orders/{id:[0-9]{1,18}}")
    config.add_route("reports", "/reports")
    config.add_route("shipments", "/shipments")
