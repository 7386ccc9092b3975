"""slim plugin: the timm model zoo as slim architectures (``--arch timm:NAME[:key=value,…]``)."""
