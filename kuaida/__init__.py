"""kuaida (快答): make generative dialogue models answer fast."""
from kuaida.errors import KuaidaError

__version__ = "0.1.0"
__all__ = ["load", "Bot", "KuaidaError", "__version__"]


def __getattr__(name: str):
    # Lazy: `import kuaida` stays cheap (torch and transformers load only when a model does).
    if name in ("load", "Bot"):
        from kuaida import bot

        return getattr(bot, name)
    raise AttributeError(name)
