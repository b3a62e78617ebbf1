"""The shared core: storage paths, tables and schemas, Zarr arrays, configs, errors, SQL, inputs. Imports nothing above it."""
