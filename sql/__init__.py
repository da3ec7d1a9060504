"""SQL functions and views that users call; applied by the migrations."""
