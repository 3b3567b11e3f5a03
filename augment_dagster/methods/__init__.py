"""The algorithms (no Dagster). ``registry.get_method(name)`` returns a method's ``MethodSpec``."""
