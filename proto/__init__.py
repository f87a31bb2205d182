"""Caffe protobuf schema (subset + AutoMTL dialect); see README.md."""
