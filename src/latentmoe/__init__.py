"""latentmoe: DeepSeek-V2 (Multi-head Latent Attention + DeepSeekMoE) — load, train, serve."""

from .checkpoint import CheckpointError, load_model, save_model
from .config import PRESETS, ModelConfig, get_config
from .model import DeepseekV2ForCausalLM, build_model, init_weights

__version__ = "0.1.0"

__all__ = ["ModelConfig", "PRESETS", "get_config", "DeepseekV2ForCausalLM", "build_model",
           "init_weights", "load_model", "save_model", "CheckpointError", "__version__"]


def __getattr__(name):
    # Heavier parts load on first use so `import latentmoe` stays light.
    if name in ("LLM", "SamplingParams", "EngineConfig"):
        from . import engine
        return getattr(engine, name)
    if name in ("Tokenizer",):
        from .tokenizer import Tokenizer
        return Tokenizer
    raise AttributeError(f"module 'latentmoe' has no attribute {name!r}")
