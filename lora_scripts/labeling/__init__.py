"""Building blocks of CLIP zero-shot auto-labelling; the command itself is `lora_scripts.label`."""
