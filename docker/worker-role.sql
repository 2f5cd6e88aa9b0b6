-- The compose stack's login role for the worker, beat and Flower: no owner, no superuser, no
-- BYPASSRLS, so row level security binds it as it binds the app. Run on every `up` (it creates
-- the role where it is missing and sets its password), so a volume from before the role existed
-- gets it too. Its grants are not here: `python -m worker migrate --grant everyskill_worker`
-- applies those the worker itself prints (`python -m worker grants everyskill_worker`).
\getenv worker_password WORKER_DB_PASSWORD
SELECT 'CREATE ROLE everyskill_worker LOGIN NOSUPERUSER NOBYPASSRLS'
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'everyskill_worker') \gexec
ALTER ROLE everyskill_worker WITH LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD :'worker_password';
