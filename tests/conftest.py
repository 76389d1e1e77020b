pytest_plugins = [
    "tests.fixtures.lab",
    "tests.fixtures.postgres",
    "tests.fixtures.moto",
]
