-- The realtime schema as Supabase projects have it, for private channels and broadcast
-- from the database: realtime.messages, realtime.topic(), realtime.send() and
-- realtime.broadcast_changes(), with upstream's signatures and payload shapes, so triggers
-- and policies written for Supabase work unchanged.

create schema if not exists realtime;

-- One row per message sent from SQL, and the rows that private channel policies are
-- written against. Partitioned by day; partitions are made ahead and dropped after the
-- retention by realtime.switchboard_maintain_partitions().
create table if not exists realtime.messages (
  topic text not null,
  extension text not null,
  payload jsonb,
  event text,
  private boolean default false,
  updated_at timestamp without time zone not null default now(),
  inserted_at timestamp without time zone not null default now(),
  id uuid not null default gen_random_uuid(),
  primary key (id, inserted_at)
) partition by range (inserted_at);

-- Row Level Security on, no policy: nobody but the owner and roles that bypass RLS sees a
-- row until the project writes policies.
alter table realtime.messages enable row level security;

create index if not exists messages_inserted_at_topic_index
  on realtime.messages (inserted_at desc, topic)
  where extension = 'broadcast' and private is true;

-- The topic a policy is evaluated for: set by the server while it checks a channel, and by
-- realtime.send() for the row it inserts.
create or replace function realtime.topic() returns text
  language sql stable
  as $$ select nullif(current_setting('realtime.topic', true), '')::text $$;

-- Sends a broadcast from SQL: the row is streamed to the topic's members. A failure is a
-- warning, never an error, so it cannot abort the caller's transaction.
create or replace function realtime.send(
  payload jsonb,
  event text,
  topic text,
  private boolean default true
) returns void
  language plpgsql
  as $$
declare
  message_id uuid := gen_random_uuid();
begin
  begin
    perform set_config('realtime.topic', topic, true);
    insert into realtime.messages (id, payload, event, topic, private, extension)
    values (
      message_id,
      case when payload ? 'id' then payload else payload || jsonb_build_object('id', message_id) end,
      event,
      topic,
      private,
      'broadcast'
    );
  exception when others then
    raise warning 'WarnSendingBroadcastMessage: %', sqlerrm;
  end;
end
$$;

-- A row trigger's change as a broadcast: {record, old_record, operation, table, schema}.
create or replace function realtime.broadcast_changes(
  topic_name text,
  event_name text,
  operation text,
  table_name text,
  table_schema text,
  new record,
  old record,
  level text default 'ROW'
) returns void
  language plpgsql
  as $$
begin
  if level = 'STATEMENT' then
    raise exception 'function can only be triggered for each row, not for each statement';
  end if;
  if operation not in ('INSERT', 'UPDATE', 'DELETE') then
    raise exception 'Unexpected operation type: %', operation;
  end if;
  perform realtime.send(
    jsonb_build_object(
      'old_record', old,
      'record', new,
      'operation', operation,
      'table', table_name,
      'schema', table_schema
    ),
    event_name,
    topic_name
  );
exception when others then
  raise exception 'Failed to process the row: %', sqlerrm;
end
$$;

-- Daily partitions from yesterday to `days_ahead` days ahead, and none older than
-- `retention`: the server calls it at start and every hour.
create or replace function realtime.switchboard_maintain_partitions(
  retention interval default interval '3 days',
  days_ahead integer default 3
) returns void
  language plpgsql
  as $$
declare
  day date;
  old record;
begin
  for day in
    select generate_series(current_date - 1, current_date + days_ahead, interval '1 day')::date
  loop
    execute format(
      'create table if not exists realtime.%I partition of realtime.messages for values from (%L) to (%L)',
      'messages_' || to_char(day, 'YYYY_MM_DD'), day, day + 1
    );
  end loop;
  for old in
    select c.relname
    from pg_inherits i
    join pg_class c on c.oid = i.inhrelid
    where i.inhparent = 'realtime.messages'::regclass
      and c.relname ~ '^messages_\d{4}_\d{2}_\d{2}$'
      and to_date(substr(c.relname, 10), 'YYYY_MM_DD') < (current_date - retention)::date
  loop
    execute format('drop table realtime.%I', old.relname);
  end loop;
end
$$;

-- Supabase's API roles, where the project has them, use the schema as upstream grants.
do $$
declare
  api_role text;
begin
  foreach api_role in array array['anon', 'authenticated', 'service_role'] loop
    if exists (select from pg_roles where rolname = api_role) then
      execute format('grant usage on schema realtime to %I', api_role);
      execute format('grant insert, select, update on realtime.messages to %I', api_role);
      execute format('grant execute on function realtime.topic() to %I', api_role);
    end if;
  end loop;
end
$$;
