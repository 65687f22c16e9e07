"""Wire-level types shared by the edge agent and the fleet server.

Pure and light: importing this package must not import OpenCV, NumPy-heavy code or any
model runtime.
"""
