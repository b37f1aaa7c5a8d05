"""Methods and benchmarks no shipped or documented model uses, kept for comparison (issue 24): outside the installed
package (nothing under dicom_node imports this folder). Run from the repository root; see experiments/README.md."""
