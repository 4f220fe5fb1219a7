"""The torch-exact bf16 AdamW (`adamw`) and the in-scan Adam accounting (`accounting`)."""
