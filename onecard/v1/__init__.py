"""Generated from proto/onecard/v1 by tools/genproto.py."""
