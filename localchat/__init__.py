"""localchat: local LLM chat, quantization and fine-tuning you can see and trust.

Layering: the runtime (this package's top level) never imports the converters
(`localchat.convert`), and imports torch only inside the GPTQ backend when it is chosen.
"""

__version__ = "0.1.0"
