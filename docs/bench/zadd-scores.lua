-- ARGV[1]=batch index, ARGV[2]=sorted(1/0), ARGV[3]=score mode ('eq' or 'inc')
local b = tonumber(ARGV[1]); local sorted = ARGV[2] == '1'; local inc = ARGV[3] == 'inc'
local x = b * 7919 + 12345
for k = 1, 50 do
  local ms = {}
  for i = 1, 1000 do
    x = (x * 1103515245 + 12345) % 2147483648
    local y = (x * 69069 + 1) % 4294967296
    ms[i] = string.format('%08x-%04x-4%03x-8%03x-%012x|%d|page|example.com|/some/path/%d|0.5000|0|sitemap||crawl|0', x, y % 65536, y % 4096, x % 4096, y * 7 + i, k, i)
  end
  if sorted then table.sort(ms) end
  local args = {}
  for i = 1, 1000 do
    local s = 1700000000000
    if inc then s = s + b * 1000 + i end
    args[#args+1] = s; args[#args+1] = ms[i]
  end
  redis.call('ZADD', 'sched:' .. k, unpack(args))
end
return 1
