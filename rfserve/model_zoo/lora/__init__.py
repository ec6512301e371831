"""Per-request LoRA adapters mixed in one batch (issue #34): files.py reads the formats users have, pool.py keeps
adapters in device slots and binds them to rows, layers.py adds each row's update in the wrapped layers."""
