"""CUDA C++ sources for cvig-engine, shipped as package data (see cvig_engine.scoring)."""
