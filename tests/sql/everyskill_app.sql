-- The EverySkill app's schema as its drizzle migrations leave it (the tables the worker touches,
-- plus columns and tables it does not), with the app's roles: an owner that migrates and a
-- non-owner login role that the app (and the worker) connect as.
CREATE EXTENSION IF NOT EXISTS vector;
CREATE SCHEMA IF NOT EXISTS drizzle;
CREATE TABLE IF NOT EXISTS drizzle."__drizzle_migrations" (
	id SERIAL PRIMARY KEY,
	hash text NOT NULL,
	created_at bigint
);
SET ROLE everyskill_owner;
CREATE TABLE IF NOT EXISTS "tenants" (
	"id" text PRIMARY KEY NOT NULL,
	"name" text NOT NULL,
	"slug" text NOT NULL,
	"domain" text,
	"logo" text,
	"is_active" boolean DEFAULT true NOT NULL,
	"created_at" timestamp DEFAULT now() NOT NULL,
	"updated_at" timestamp DEFAULT now() NOT NULL,
	CONSTRAINT "tenants_slug_unique" UNIQUE("slug")
);
CREATE TABLE IF NOT EXISTS "users" (
	"id" text PRIMARY KEY NOT NULL,
	"tenant_id" text NOT NULL,
	"email" text NOT NULL,
	"name" text
);
CREATE TABLE IF NOT EXISTS "skills" (
	"id" text PRIMARY KEY NOT NULL,
	"tenant_id" text NOT NULL,
	"slug" text NOT NULL,
	"name" text NOT NULL,
	"description" text NOT NULL,
	"category" text DEFAULT 'prompt' NOT NULL,
	"content" text NOT NULL,
	"author_id" text,
	"status" text DEFAULT 'draft' NOT NULL,
	"visibility" text DEFAULT 'tenant' NOT NULL,
	"total_uses" integer DEFAULT 0 NOT NULL,
	"created_at" timestamp DEFAULT now() NOT NULL,
	"updated_at" timestamp DEFAULT now() NOT NULL
);
CREATE TABLE IF NOT EXISTS "skill_embeddings" (
	"id" text PRIMARY KEY NOT NULL,
	"tenant_id" text NOT NULL,
	"skill_id" text NOT NULL,
	"embedding" vector(768) NOT NULL,
	"model_name" text NOT NULL,
	"dimensions" integer NOT NULL,
	"input_hash" text NOT NULL,
	"created_at" timestamp DEFAULT now() NOT NULL,
	"updated_at" timestamp DEFAULT now() NOT NULL,
	CONSTRAINT "skill_embeddings_tenant_skill_unique" UNIQUE("tenant_id","skill_id")
);
CREATE TABLE IF NOT EXISTS "site_settings" (
	"id" text PRIMARY KEY DEFAULT 'default' NOT NULL,
	"tenant_id" text,
	"semantic_similarity_enabled" boolean DEFAULT false NOT NULL,
	"ollama_url" text DEFAULT 'http://localhost:11434' NOT NULL,
	"ollama_model" text DEFAULT 'nomic-embed-text' NOT NULL,
	"embedding_dimensions" integer DEFAULT 768 NOT NULL,
	"last_successful_connection" timestamp,
	"updated_at" timestamp DEFAULT now() NOT NULL,
	CONSTRAINT "site_settings_tenant_id_unique" UNIQUE("tenant_id")
);
ALTER TABLE "users" ADD CONSTRAINT "users_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES "public"."tenants"("id") ON DELETE no action ON UPDATE no action;
ALTER TABLE "skills" ADD CONSTRAINT "skills_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES "public"."tenants"("id") ON DELETE no action ON UPDATE no action;
ALTER TABLE "skills" ADD CONSTRAINT "skills_author_id_users_id_fk" FOREIGN KEY ("author_id") REFERENCES "public"."users"("id") ON DELETE no action ON UPDATE no action;
ALTER TABLE "skill_embeddings" ADD CONSTRAINT "skill_embeddings_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES "public"."tenants"("id") ON DELETE no action ON UPDATE no action;
ALTER TABLE "skill_embeddings" ADD CONSTRAINT "skill_embeddings_skill_id_skills_id_fk" FOREIGN KEY ("skill_id") REFERENCES "public"."skills"("id") ON DELETE cascade ON UPDATE no action;
ALTER TABLE "site_settings" ADD CONSTRAINT "site_settings_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES "public"."tenants"("id") ON DELETE no action ON UPDATE no action;
CREATE UNIQUE INDEX IF NOT EXISTS "skills_tenant_slug_idx" ON "skills" USING btree ("tenant_id","slug");
CREATE INDEX IF NOT EXISTS "skill_embeddings_hnsw_idx" ON "skill_embeddings" USING hnsw ("embedding" vector_cosine_ops);
ALTER TABLE "skills" ENABLE ROW LEVEL SECURITY;
ALTER TABLE "skill_embeddings" ENABLE ROW LEVEL SECURITY;
ALTER TABLE "site_settings" ENABLE ROW LEVEL SECURITY;
ALTER TABLE "users" ENABLE ROW LEVEL SECURITY;
CREATE POLICY "tenant_isolation" ON "skills" AS PERMISSIVE FOR ALL TO public USING (tenant_id = current_setting('app.current_tenant_id', true) OR visibility = 'global_approved') WITH CHECK (tenant_id = current_setting('app.current_tenant_id', true));
CREATE POLICY "tenant_isolation" ON "skill_embeddings" AS PERMISSIVE FOR ALL TO public USING (tenant_id = current_setting('app.current_tenant_id', true)) WITH CHECK (tenant_id = current_setting('app.current_tenant_id', true));
CREATE POLICY "tenant_isolation" ON "site_settings" AS PERMISSIVE FOR ALL TO public USING (tenant_id = current_setting('app.current_tenant_id', true)) WITH CHECK (tenant_id = current_setting('app.current_tenant_id', true));
CREATE POLICY "tenant_isolation" ON "users" AS PERMISSIVE FOR ALL TO public USING (tenant_id = current_setting('app.current_tenant_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO everyskill_app;
ALTER DEFAULT PRIVILEGES FOR ROLE everyskill_owner IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO everyskill_app;
RESET ROLE;
