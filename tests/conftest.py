from hypothesis import settings

from postbus.kit.testing import examples

pytest_plugins = ["postbus.kit.testing"]

# property tests without their own settings: 100 examples, more under `make fuzz`
settings.register_profile("postbus", max_examples=examples(100))
settings.load_profile("postbus")
