"""Shared test inputs of the end-to-end tests."""

import sys

SERVER = [sys.executable, "-m", "hirope_lsp", "serve"]

GEOMETRY = '''import math


class Circle:
    """A circle. 圆 😀"""

    def __init__(self, radius):
        self.radius = radius

    def area(self):
        return math.pi * self.radius ** 2

    def circumference(self):
        return 2 * math.pi * self.
'''

HELPERS = '''def clamp(value, low, high):
    return max(low, min(value, high))
'''
