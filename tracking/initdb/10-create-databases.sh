#!/bin/sh
# Run once by the postgres image on first start (empty data volume): create the MLflow and Optuna databases.
# Also runnable by hand against any server: PGHOST=127.0.0.1 POSTGRES_USER=postgres MLFLOW_DB=mlflow \
#   OPTUNA_DB=optuna sh tracking/initdb/10-create-databases.sh   (databases that exist already are kept)
set -eu
for db in "${MLFLOW_DB:-mlflow}" "${OPTUNA_DB:-optuna}"; do
    exists=$(psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = '$db'")
    if [ "$exists" = "1" ]; then
        echo "database $db exists"
    else
        psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -c "CREATE DATABASE \"$db\""
        echo "database $db created"
    fi
done
