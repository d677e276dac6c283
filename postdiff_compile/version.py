"""The package version, in its own module so that the artifact writers can record it without importing the
package face."""
__version__ = "0.1.0"
