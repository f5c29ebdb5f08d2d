"""`make report`: the SQL of sql/queries/ against BigQuery (local emulator or real), as terminal
tables and one self-contained HTML file with plots."""
