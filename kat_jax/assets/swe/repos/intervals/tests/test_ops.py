import unittest

from intervals import merge, total_length


class TestMerge(unittest.TestCase):
    def test_overlapping(self):
        self.assertEqual(merge([(1, 4), (2, 5)]), [(1, 5)])

    def test_disjoint(self):
        self.assertEqual(merge([(5, 6), (1, 2)]), [(1, 2), (5, 6)])

    def test_total_length(self):
        self.assertEqual(total_length([(0, 2), (1, 3), (10, 11)]), 4)
