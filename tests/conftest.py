pytest_plugins = ["postbus.kit.testing"]
