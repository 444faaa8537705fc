-- Run once by the postgres image on an empty data folder (POSTGRES_DB creates `prefect`).
-- MLflow's tracking store and its basic-auth user store get databases of their own.
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
