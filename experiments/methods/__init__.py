"""Experimental scoring methods (dicom_node.models.methods.base.ScoringMethod), one per module."""
