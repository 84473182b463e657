def includeme(config):
    config.add_route("home", "/")
    config.add_route("orders", "/orders")
    config.add_route("order", "/orders/{id}")
    config.add_route("reports", "/reports")
