def includeme(config):
    config.add_route("home", "/")
    config.add_route("order", "/orders/{id}")
