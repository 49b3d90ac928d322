#!/bin/sh
# Run once by the postgres image on first start (empty data volume): the MLflow and Optuna databases, each owned by
# a login role of the same name (password MLFLOW_DB_PASSWORD / OPTUNA_DB_PASSWORD) that is no superuser, cannot
# create databases or roles, and is the only role (besides the superuser) allowed to connect to its database.
# Also runnable by hand against any server: PGHOST=127.0.0.1 POSTGRES_USER=postgres MLFLOW_DB=mlflow \
#   OPTUNA_DB=optuna MLFLOW_DB_PASSWORD=... OPTUNA_DB_PASSWORD=... sh tracking/initdb/10-create-databases.sh
# (what exists already is kept; the roles' passwords are set again). The passwords travel as psql variables, never
# on a command line.
set -eu
setup() {   # $1 database (= role), $2 password
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -q \
        -v db="$1" -v pw="$2" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE', :'db')
    WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'db') \gexec
SELECT format('ALTER ROLE %I WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %L', :'db', :'pw') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'db')
    WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') \gexec
SELECT format('ALTER DATABASE %I OWNER TO %I', :'db', :'db') \gexec
SELECT format('REVOKE ALL ON DATABASE %I FROM PUBLIC', :'db') \gexec
SELECT format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO %I', :'db', :'db') \gexec
SQL
    echo "database $1: role $1, owner, the only one that may connect"
}
setup "${MLFLOW_DB:-mlflow}" "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD}"
setup "${OPTUNA_DB:-optuna}" "${OPTUNA_DB_PASSWORD:?set OPTUNA_DB_PASSWORD}"
