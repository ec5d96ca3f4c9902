"""mmkit: faster and more truthful LLaVA-class vision-language models on stock HF transformers.

    import mmkit
    session = mmkit.load("reference", methods=["fastv:layer=2,keep=0.25"])
    print(session.generate("scene.png", "Describe the image in detail.")[0].text)
"""

__version__ = "0.1.0"

__all__ = ["load", "Session", "list_methods", "register_method", "parse_spec", "MmkitError", "__version__"]


def __getattr__(name):
    # Lazy: `import mmkit` must stay cheap (no torch/transformers import) for the CLI's fast paths.
    if name in ("load", "Session"):
        from mmkit import session

        return getattr(session, name)
    if name in ("list_methods", "register_method", "parse_spec"):
        from mmkit import registry

        return getattr(registry, name)
    if name == "MmkitError":
        from mmkit.errors import MmkitError

        return MmkitError
    raise AttributeError(f"module 'mmkit' has no attribute {name!r}")
