import unittest

from romanum import from_roman, to_roman


class TestRoman(unittest.TestCase):
    def test_additive(self):
        self.assertEqual(to_roman(8), "VIII")
        self.assertEqual(to_roman(2000), "MM")

    def test_from_roman(self):
        self.assertEqual(from_roman("MCMXCIV"), 1994)
