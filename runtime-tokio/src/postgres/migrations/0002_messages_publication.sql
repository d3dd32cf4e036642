-- The rows realtime.send() and realtime.broadcast_changes() insert are streamed by the
-- same slot as postgres_changes, through a publication of their own: the project's
-- publication stays the project's.
do $$
begin
  if not exists (select from pg_publication where pubname = 'switchboard_messages') then
    create publication switchboard_messages for table realtime.messages
      with (publish = 'insert', publish_via_partition_root = true);
  end if;
end
$$;
