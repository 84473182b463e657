def includeme(config):
    config.add_route("checkout", "/checkout")
    config.add_route("orders", "/orders")
    config.add_route("order", "/orders/{id}")
