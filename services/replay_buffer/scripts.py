"""Lua scripts the buffer runs inside Redis (each one is atomic, like MULTI/EXEC).

ACK reads the batch record written at Sample time, so an Ack sends one batch id instead of every
stream id and episode id again (at 256 episodes that halved the Ack's latency here).
"""

# KEYS: 1 stream, 2 batches, 3 trained, 4 acked_batches, 5 reuse, 6 stats
# ARGV: 1 group, 2 batch_id, 3 now (unix s), 4 dedupe history, 5 max_times_sampled
# An entry is done when trained max_times_sampled times: XACK + XDEL, its episode id remembered.
# Otherwise its count ("times:version") goes to `reuse`. Returns the number done, -1 if no record.
ACK = """
local raw = redis.call('HGET', KEYS[2], ARGV[2])
if not raw then return -1 end
local rec = cjson.decode(raw)
local max_times = tonumber(ARGV[5])
local done, episodes = {}, {}
for i, sid in ipairs(rec.s) do
  local times = 1
  if max_times > 1 then
    local cur = redis.call('HGET', KEYS[5], sid)
    if cur then times = tonumber(string.match(cur, '^(%d+)')) + 1 end
  end
  if times >= max_times then
    done[#done + 1] = sid
    episodes[#episodes + 1] = rec.e[i]
  else
    redis.call('HSET', KEYS[5], sid, times .. ':' .. rec.v)
  end
end
-- unpack in chunks: Lua's C stack holds ~8000 values
for i = 1, #done, 1000 do
  local chunk = {unpack(done, i, math.min(i + 999, #done))}
  redis.call('XACK', KEYS[1], ARGV[1], unpack(chunk))
  redis.call('XDEL', KEYS[1], unpack(chunk))
  if max_times > 1 then redis.call('HDEL', KEYS[5], unpack(chunk)) end
end
for _, e in ipairs(episodes) do redis.call('ZADD', KEYS[3], ARGV[3], e) end
if #episodes > 0 then redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -tonumber(ARGV[4]) - 1) end
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[2])
redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -tonumber(ARGV[4]) - 1)
redis.call('HINCRBY', KEYS[6], 'acked_total', #done)
return #done
"""
