import unittest

from statskit import mean, median, mode


class TestStats(unittest.TestCase):
    def test_mean(self):
        self.assertEqual(mean([1, 2, 3]), 2)

    def test_median_odd(self):
        self.assertEqual(median([3, 1, 2]), 2)

    def test_mode(self):
        self.assertEqual(mode([1, 2, 2, 3]), 2)
