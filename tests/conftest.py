pytest_plugins = ["nats_fixtures", "data_fixtures"]
