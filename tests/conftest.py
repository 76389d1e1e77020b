pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.moto",
    "tests.fixtures.service",
]
